Return-Path: <dave.fischer@supplier.example>
Delivered-To: alice@example.com
Received: from mx1.supplier.example (mx1.supplier.example [192.0.2.25])
	by mail.example.com with ESMTPS id 4XyQ2c6TnFz9sXb
	for <alice@example.com>; Tue, 26 Nov 2024 07:02:49 +0000
From: Dave Fischer <dave.fischer@supplier.example>
To: Alice Martin <alice@example.com>
Subject: Re: Delivery schedule for order 4471
Date: Tue, 26 Nov 2024 08:02:47 +0100
Message-ID: <20241126070247.4471.dfischer@supplier.example>
In-Reply-To: <CAM4x7Kq0wY2e8pZ-aMartin.20241125T1032@example.com>
References: <20241125081512.4471.dfischer@supplier.example>
 <CAM4x7Kq0wY2e8pZ-aMartin.20241125T1032@example.com>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii
Content-Transfer-Encoding: 7bit

Hi Alice,

Understood: we will hold the first batch and ship all 48 units together
on Tuesday 3 December, arriving Thursday 5 December. The tracking number
follows once the freight is booked.

Dave

On Mon, 25 Nov 2024 at 10:32, Alice Martin <alice@example.com> wrote:
> Hi Dave,
>
> Thanks for the schedule. We would rather have one delivery: please ship
> all 48 units together on 3 December.
>
> Alice
>
>> On Mon, 25 Nov 2024 at 09:15, Dave Fischer wrote:
>> As promised on the phone, here is the delivery schedule for order 4471
>> (48 units of the DX-200 controller):
