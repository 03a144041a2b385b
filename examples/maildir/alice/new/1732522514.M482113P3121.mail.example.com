Return-Path: <dave.fischer@supplier.example>
Delivered-To: alice@example.com
Received: from mx1.supplier.example (mx1.supplier.example [192.0.2.25])
	by mail.example.com with ESMTPS id 4Xy7Qk2Vd1z9sWn
	for <alice@example.com>; Mon, 25 Nov 2024 08:15:14 +0000
From: Dave Fischer <dave.fischer@supplier.example>
To: Alice Martin <alice@example.com>
Cc: Bob Okafor <bob@example.com>
Subject: Delivery schedule for order 4471
Date: Mon, 25 Nov 2024 09:15:12 +0100
Message-ID: <20241125081512.4471.dfischer@supplier.example>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii
Content-Transfer-Encoding: 7bit

Hello Alice,

As promised on the phone, here is the delivery schedule for order 4471
(48 units of the DX-200 controller):

  - 20 units ship on Wednesday 27 November, arriving Friday 29 November
  - 28 units ship on Tuesday 3 December, arriving Thursday 5 December

The second batch waits for the revised firmware (v2.4.1). If you would
rather receive all 48 units together on 5 December, let me know by
Tuesday noon and I will hold the first batch.

I have copied Bob, since his team does the installation.

Best regards,
Dave Fischer
Account Manager, Fischer Components GmbH
+49 30 555 0142
